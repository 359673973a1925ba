"""The Starlette example (a package only so pytest can tell it from the Flask one)."""
