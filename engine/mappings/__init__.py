"""Mapping files: analysts' YAML that says which source fields fill which domain fields."""
