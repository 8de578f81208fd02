"""The domain: patients and imaging orders, and the rules that keep them in sync from feeds."""
