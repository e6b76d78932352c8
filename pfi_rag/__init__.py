"""pfi-rag."""
