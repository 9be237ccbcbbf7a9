"""The change feed: every change to the archive in one ordered, replayable feed with a sequence."""
