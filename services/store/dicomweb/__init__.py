"""The DICOMweb HTTP service: stateless, any number of replicas over one shared catalogue."""
