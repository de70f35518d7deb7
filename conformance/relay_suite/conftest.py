"""Loads the suite's plugin when pytest is pointed at this directory.

If the plugin was already passed to pytest.main(plugins=[...]) it is
registered under the same module name and is not loaded twice.
"""

pytest_plugins = ["parley.conformance.relay_suite.plugin"]
