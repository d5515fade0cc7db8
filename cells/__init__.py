"""Ready role compositions: each module builds a :class:`flare_async.Cell` for one role.

Server, relay and edge are the same ``Cell`` type; they differ only in the handler tables
mounted on them and the URLs they listen on or connect to. ``cells/topologies/*.toml`` describe
deployments that ``flare-async up`` provisions and starts as one process per cell.
"""
