"""The broker's producer side: task names, Redis connections, and publishing a conversion."""
