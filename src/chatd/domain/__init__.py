"""Pure types shared by every subsystem: no I/O here."""
