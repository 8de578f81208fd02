"""HTTP: /health, /metrics and the admin API (/api/), as small aiohttp apps."""
