"""The hospital client: the ClientApp."""
