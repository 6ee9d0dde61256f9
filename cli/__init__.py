"""The `eclipse-prior` command line: the top of the import graph."""
