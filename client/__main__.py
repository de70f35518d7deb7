"""`python -m parley.client` is the `parley` command."""

from .cli import main

if __name__ == "__main__":
    main()
