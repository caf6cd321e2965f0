"""The compile pipeline and its command line."""
