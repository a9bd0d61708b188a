"""pluggy hookspecs: how backends (built-in and third-party) reach deepport."""
import pluggy

PROJECT = "deepport"
ENTRY_POINT_GROUP = "deepport"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def deepport_backends():
    """Return a list of `deepport.core.registry.Backend` descriptors this plugin provides.

    A plugin package declares ``[project.entry-points.deepport] <name> = "<module>"`` where <module>
    defines a function named ``deepport_backends`` decorated with ``deepport.core.plugins.hookimpl``.
    """
