"""Lightning callbacks that measure what crosses the link between client and server."""
