"""A rogue app for the security tests."""
