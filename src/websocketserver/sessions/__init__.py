"""Sessions: reservations and their store interface, the services and one Session per
token, the built-in applications."""
