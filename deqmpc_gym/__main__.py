"""``python -m deqmpc_gym``: the ``deqmpc-gym`` command line (:func:`deqmpc_gym.cli.main`)."""

from deqmpc_gym.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
