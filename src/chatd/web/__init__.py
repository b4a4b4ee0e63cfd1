"""The HTTP and WebSocket edge (Quart-Trio on Hypercorn)."""
