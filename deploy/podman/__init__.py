"""Building genmesh's images and running its Kubernetes manifests with Podman on one machine
(`make images`, `make k8s-up`, `make k8s-down`): see deploy/k8s/README.md."""
