"""`python -m parley.relay`: the same command as `parley relay`."""

from .cli import main

if __name__ == "__main__":
    main()
