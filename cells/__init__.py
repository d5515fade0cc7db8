"""Ready role compositions (layer L5, like ``flare_async.cli``): one module per role.

Server, relay and edge are the same ``Cell`` type; they differ only in the handler tables
mounted on them and the URLs they listen on or connect to. Each module has two builders:

* ``build(...)``: the fabric alone (``sys`` handlers and yours), for cells in one process over
  ``memory://`` or addresses of your own (``examples/fabric_in_process.py``);
* ``from_kit(kit, jobs=DIR)``: the role exactly as ``flare-async run KIT --jobs DIR`` runs it,
  built by the one composition both use (:class:`flare_async.cli.RoleCell`): the server's job
  service, a relay's aggregator, a site's job runner under its privacy policy.

Only public names are imported here. ``cells/topologies/*.toml`` describe deployments that
``flare-async up`` provisions and starts as one process per cell.
"""
