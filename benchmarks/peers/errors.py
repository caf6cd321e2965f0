"""The one exception the driver turns into a single line on stderr and exit status 2."""


class PeersError(Exception):
    pass
