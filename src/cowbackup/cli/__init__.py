"""The ``cowbackup`` command line."""
