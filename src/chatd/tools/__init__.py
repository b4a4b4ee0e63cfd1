"""Built-in tools and validation of client-declared (dynamic) tools."""
