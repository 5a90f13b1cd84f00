"""``python -m eventsched`` is the same entry as the ``eventsched`` console script."""

from eventsched.cli import main

if __name__ == "__main__":
    main()
