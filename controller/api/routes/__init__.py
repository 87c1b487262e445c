"""One route table per API resource."""
