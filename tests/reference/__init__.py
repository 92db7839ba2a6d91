"""Reference code the tests compare against. Import as `from reference.X import ...`."""
