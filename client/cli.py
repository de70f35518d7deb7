import click
@click.group()
@click.version_option(package_name="parley")
def main(): pass
