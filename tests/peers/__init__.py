"""Faithful transcriptions of peer codebases' data-reading logic, used to test that our exports load there."""
