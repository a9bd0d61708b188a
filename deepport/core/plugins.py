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


HINT = "set DEEPPORT_PLUGINS_AUTOLOAD=0 to run without third-party plugins, or uninstall the package"


def load_entry_points(pm: pluggy.PluginManager) -> tuple[dict[str, str], dict[str, str]]:
    """Register every `deepport` entry point, each on its own: one that fails to import is recorded, never raised.

    Returns ({plugin name: package}, {entry point name: why it failed, naming its package}).
    """
    import importlib.metadata

    packages, failures = {}, {}
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.is_blocked(ep.name):
                continue
            package = dist.metadata["Name"] or "?"
            if pm.has_plugin(ep.name):
                if packages.get(ep.name) != package:
                    failures[ep.name] = (f"entry point {ep.name!r} is declared by both package "
                                         f"{packages.get(ep.name)!r} and package {package!r}; {HINT}")
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except (Exception, SystemExit) as e:  # a broken plugin must never take deepport down
                failures[ep.name] = (f"plugin {ep.name!r} (package {package!r}, {ep.value}) failed to import: "
                                     f"{type(e).__name__}: {e}; {HINT}")
                continue
            packages[ep.name] = package
    return packages, failures
