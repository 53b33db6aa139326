"""
Upload documents dropped into per-client folders to the coreplus File API.

The package is split by concern: ``config`` loads settings, ``folders`` maps drop
folders to clients, ``settle`` decides when a file is finished, ``watcher`` finds
files, ``ledger`` remembers every file version, ``client`` talks HTTP to coreplus,
``daemon`` wires them together and ``cli`` is the command line.
"""

__version__ = "0.1.0"
