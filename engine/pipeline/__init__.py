"""From received bytes to applied domain changes: the writer, inbound handlers and actions."""
