"""The router: study completion, rule-based routing, study-affine forwarding to gateways."""
