"""The HTTP port: files, the REST API and the dashboard."""
