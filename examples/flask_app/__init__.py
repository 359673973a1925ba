"""The Flask example (a package only so pytest can tell it from the Starlette one)."""
