"""Example apps and plugins for the gateway (see docs/plugins.md).

Run one with ``gateway run --app examples.<module>:make_app`` from the repository root.
"""
