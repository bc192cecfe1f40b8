"""The runtime: generation engine, HTTP app, schemas, auth, limits, metrics, and the CLI."""
