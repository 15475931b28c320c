// Command etcd is etcd v3.6.16 (go.etcd.io/etcd/server/v3/etcdmain), built from the Go module proxy for
// tests/servers/kubernetes.py (`go install go.etcd.io/etcd/server/v3@v3.6.16` refuses its replace
// directives). Flags are etcd's own.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
