"""The customer-service desk (docs/customer-service.md)."""
