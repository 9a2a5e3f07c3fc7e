"""Image–caption data: the built-in synthetic benchmark and loaders for user data."""
