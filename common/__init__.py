"""Plain building blocks (data, model, metrics, wire format) shared by the server and the clients."""
