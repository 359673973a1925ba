"""Lets ``app.py`` import ``messages_pb2`` under pytest as it does when run as
a script (the script's directory is then on ``sys.path``)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.append(HERE)
