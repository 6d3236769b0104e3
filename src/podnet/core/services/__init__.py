"""Service load balancing: the three backends behind one interface (core layer, sans-IO)."""
