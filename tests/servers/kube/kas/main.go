// Command kube-apiserver is the Kubernetes API server v1.36.3 (k8s.io/kubernetes/cmd/kube-apiserver),
// built from the Go module proxy for tests/servers/kubernetes.py: k8s.io/kubernetes lists its staging
// modules as v0.0.0 with "=> ./staging/..." replaces, so go.mod replaces each of them with the published
// v0.36.3. Flags are kube-apiserver's own.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
