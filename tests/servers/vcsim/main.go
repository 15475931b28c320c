// Command vcsim serves a govmomi simulator (github.com/vmware/govmomi/simulator, v0.56.0) for the vSphere
// driver's tests: a VPX() model (vCenter: 1 datacenter DC0, 1 standalone host DC0_H0, 1 cluster DC0_C0 with
// 3 hosts, a DVS with port group DC0_DVPG0) changed as follows:
//
//   - no datastores named LocalDS_N: the datastores given by -datastores (default "datastore1,datastore2")
//     are created on every host, each backed by the folder <-datastore-dir>/<name> on this machine;
//   - no default VMs (VPX() would create 4 powered-on VMs DC0_H0_VM0.. on LocalDS_0); -stock-vms keeps the
//     VPX() default datastore LocalDS_0 and its VMs as well (for probing only);
//   - besides the standard network "VM Network" that every simulated datacenter has, the standard port
//     groups given by -networks (default "VM Network 2") are added to vSwitch0, so a vim.Network with that
//     name is in DC0's networkFolder and a NIC with a VirtualEthernetCardNetworkBackingInfo(deviceName=...)
//     can reference it.
//
// It also works around three simulator faults that pyvmomi 9.1.1 trips over (see fixer and guardCreateVM):
// empty enums in vm.runtime, task.info.entity set to a non-ManagedEntity manager, and a panic that killed the
// process on CreateVM_Task with an unknown datastore.
//
// It listens on -listen (default 127.0.0.1:0) with TLS: -cert/-key (PEM) when given, else the simulator's
// built-in localhost certificate. Only -username with the password from $VCSIM_PASSWORD (or -password) can
// log in. When ready it prints exactly one line to stdout:
//
//	VCSIM_READY https://127.0.0.1:PORT/sdk dir=<datastore-dir>
//
// and it serves until SIGINT/SIGTERM, then removes the simulator's temporary folder (not -datastore-dir).
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0 = any free port)")
	certFile := flag.String("cert", "", "TLS certificate (PEM); empty = the simulator's built-in localhost cert")
	keyFile := flag.String("key", "", "TLS private key (PEM) for -cert")
	username := flag.String("username", "administrator@vsphere.local", "the only user that can log in")
	password := flag.String("password", "", "its password (default: $VCSIM_PASSWORD; one of them is required)")
	dsDir := flag.String("datastore-dir", "", "folder holding one sub-folder per datastore (required)")
	dsNames := flag.String("datastores", "datastore1,datastore2", "comma-separated datastore names")
	netNames := flag.String("networks", "VM Network 2", "comma-separated extra standard port groups")
	stockVMs := flag.Bool("stock-vms", false, "also keep VPX()'s LocalDS_0 and its 4 default VMs")
	trace := flag.Bool("trace", false, "write SOAP traffic to stderr")
	flag.Parse()

	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetOutput(os.Stderr)

	pass := *password
	if pass == "" {
		pass = os.Getenv("VCSIM_PASSWORD")
	}
	if pass == "" || *username == "" {
		log.Fatal("a username and a password (-password or $VCSIM_PASSWORD) are required")
	}
	if *dsDir == "" {
		log.Fatal("-datastore-dir is required")
	}
	root, err := filepath.Abs(*dsDir)
	if err != nil {
		log.Fatal(err)
	}
	simulator.Trace = *trace

	model := simulator.VPX()
	model.Datastore = 0
	model.Machine = 0
	if *stockVMs {
		model.Datastore = 1
		model.Machine = 2
	}
	if err := model.Create(); err != nil {
		log.Fatalf("model: %v", err)
	}
	defer model.Remove()

	if err := customize(model, root, split(*dsNames), split(*netNames)); err != nil {
		log.Fatalf("customize: %v", err)
	}
	fixer := &fixer{self: types.ManagedObjectReference{Type: "VmmigrationFixer", Value: "fixer"}}
	for _, obj := range model.Service.Context.Map.All("Datacenter") {
		if dc, ok := obj.(*simulator.Datacenter); ok && fixer.dc.Value == "" {
			fixer.dc, fixer.dcName = dc.Self, dc.Name
		}
	}
	model.Service.Context.Map.AddHandler(fixer)
	model.Service.Context.Map.Handler = guardCreateVM
	for _, obj := range model.Service.Context.Map.All("VirtualMachine") {
		fixer.PutObject(nil, obj)
	}

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, pass)}
	model.Service.TLS = new(tls.Config)
	if *certFile != "" || *keyFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("TLS key pair: %v", err)
		}
		model.Service.TLS.Certificates = []tls.Certificate{cert}
	}

	server := model.Service.NewServer()
	defer server.Close()

	u := *server.URL
	u.User = nil // never print the password
	fmt.Printf("VCSIM_READY %s dir=%s\n", u.String(), root)
	_ = os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	s := <-sig
	log.Printf("got %s, stopping", s)
}

func split(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// customize adds the datastores (on every host of every datacenter) and the standard port groups, talking
// to the simulator in-process (model.Service is a soap.RoundTripper with an internal session).
func customize(model *simulator.Model, root string, datastores, networks []string) error {
	ctx := context.Background()
	c, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return err
	}
	finder := find.NewFinder(c, false)
	dcs, err := finder.DatacenterList(ctx, "*")
	if err != nil {
		return err
	}
	for _, dc := range dcs {
		finder.SetDatacenter(dc)
		hosts, err := finder.HostSystemList(ctx, "*")
		if err != nil {
			return err
		}
		for _, name := range datastores {
			dir := filepath.Join(root, name)
			if len(dcs) > 1 {
				dir = filepath.Join(root, dc.Name(), name)
			}
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			for _, host := range hosts {
				dss, err := host.ConfigManager().DatastoreSystem(ctx)
				if err != nil {
					return err
				}
				if _, err := dss.CreateLocalDatastore(ctx, name, dir); err != nil {
					return fmt.Errorf("datastore %s on %s: %w", name, host.Name(), err)
				}
			}
		}
		for _, name := range networks {
			if err := addPortGroup(ctx, model, hosts, name); err != nil {
				return err
			}
		}
	}
	return nil
}

// addPortGroup adds a standard port group on vSwitch0 of the first host, which creates the vim.Network in the
// datacenter's networkFolder (the simulator refuses a second AddPortGroup of that name with DuplicateName), then
// attaches that network to every host and compute resource so that host.network lists it, as on a real vCenter
// where each host has the port group.
func addPortGroup(ctx context.Context, model *simulator.Model, hosts []*object.HostSystem, name string) error {
	if len(hosts) == 0 {
		return nil
	}
	ns, err := hosts[0].ConfigManager().NetworkSystem(ctx)
	if err != nil {
		return err
	}
	spec := types.HostPortGroupSpec{Name: name, VswitchName: "vSwitch0", Policy: types.HostNetworkPolicy{}}
	if err := ns.AddPortGroup(ctx, spec); err != nil {
		return fmt.Errorf("port group %q: %w", name, err)
	}
	reg := model.Service.Context.Map
	var netRef *types.ManagedObjectReference
	for _, obj := range reg.All("Network") {
		if e, ok := obj.(mo.Entity); ok && e.Entity().Name == name {
			ref := obj.Reference()
			netRef = &ref
		}
	}
	if netRef == nil {
		return fmt.Errorf("port group %q: no Network object after AddPortGroup", name)
	}
	for _, h := range hosts {
		hs, ok := reg.Get(h.Reference()).(*simulator.HostSystem)
		if !ok {
			continue
		}
		hs.Network = appendRef(hs.Network, *netRef)
		if hs.Parent != nil {
			switch cr := reg.Get(*hs.Parent).(type) {
			case *simulator.ClusterComputeResource:
				cr.Network = appendRef(cr.Network, *netRef)
			case *mo.ComputeResource:
				cr.Network = appendRef(cr.Network, *netRef)
			}
		}
	}
	return nil
}

func appendRef(refs []types.ManagedObjectReference, ref types.ManagedObjectReference) []types.ManagedObjectReference {
	for _, r := range refs {
		if r == ref {
			return refs
		}
	}
	return append(refs, ref)
}

// guardCreateVM refuses CreateVM_Task when the spec names a datastore that does not exist, in
// files.vmPathName or in a device's file backing: the simulator (v0.56.0) panics in NewVirtualMachine
// ("interface conversion: mo.Entity is nil, not *simulator.Datastore") and the whole process dies. The call
// itself fails with vim.fault.InvalidDatastorePath (a real vCenter returns a task that fails instead).
func guardCreateVM(ctx *simulator.Context, method *simulator.Method) (mo.Reference, types.BaseMethodFault) {
	req, ok := method.Body.(*types.CreateVM_Task)
	if !ok {
		return nil, nil
	}
	known := map[string]bool{}
	for _, obj := range ctx.Map.All("Datastore") {
		if e, ok := obj.(mo.Entity); ok {
			known[e.Entity().Name] = true
		}
	}
	paths := []string{}
	if req.Config.Files != nil {
		paths = append(paths, req.Config.Files.VmPathName)
	}
	for _, change := range req.Config.DeviceChange {
		spec := change.GetVirtualDeviceConfigSpec()
		if spec.Device == nil {
			continue
		}
		if b, ok := spec.Device.GetVirtualDevice().Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
			paths = append(paths, b.GetVirtualDeviceFileBackingInfo().FileName)
		}
	}
	for _, p := range paths {
		var dp object.DatastorePath
		if !dp.FromString(p) || dp.Datastore == "" || !known[dp.Datastore] {
			if p == "" && len(paths) > 1 {
				continue // a disk without a file name: the simulator picks one in the VM's folder
			}
			return nil, &types.InvalidDatastorePath{DatastorePath: p}
		}
	}
	return nil, nil
}

// fixer is a Registry handler that makes two things the simulator produces readable by pyvmomi 9.1.1:
//
//  1. Enum properties left empty in the VMs it creates: runtime.faultToleranceState and
//     runtime.recordReplayState are sent as <faultToleranceState></faultToleranceState>, which pyvmomi cannot
//     decode (AttributeError: type object "vim.VirtualMachine.FaultToleranceState" has no attribute with an
//     empty name), so reading vm.runtime or vm.summary failed. A real vCenter reports "notConfigured" and
//     "inactive" for a VM without fault tolerance or record/replay.
//  2. Tasks of managers that are not ManagedEntities (VirtualDiskManager, FileManager, ...) carry the manager
//     as task.info.entity, which pyvmomi refuses (TypeError: For "entity" expected type vim.ManagedEntity, but
//     got vim.VirtualDiskManager), so reading task.info failed. Such tasks get the datacenter as their entity,
//     as the simulator itself does for HostDatastoreBrowser tasks (their entity is the datastore). The task's
//     entity is also what the simulator locks while the task runs: the datacenter instead of the manager.
type fixer struct {
	self   types.ManagedObjectReference
	dc     types.ManagedObjectReference
	dcName string
}

var notManagedEntities = map[string]bool{
	"VirtualDiskManager":                 true,
	"FileManager":                        true,
	"VcenterVStorageObjectManager":       true,
	"HostVStorageObjectManager":          true,
	"StorageResourceManager":             true,
	"CryptoManagerKmip":                  true,
	"VirtualMachineCompatibilityChecker": true,
	"VirtualMachineProvisioningChecker":  true,
	"OvfManager":                         true,
	"ServiceInstance":                    true,
	"TaskManager":                        true,
}

func (f *fixer) Reference() types.ManagedObjectReference { return f.self }

func (f *fixer) PutObject(_ *simulator.Context, obj mo.Reference) {
	switch o := obj.(type) {
	case *simulator.VirtualMachine:
		fixRuntime(&o.VirtualMachine)
	case *mo.VirtualMachine:
		fixRuntime(o)
	case *simulator.Task:
		if e := o.Info.Entity; e != nil && notManagedEntities[e.Type] && f.dc.Value != "" {
			ref := f.dc
			o.Info.Entity = &ref
			o.Info.EntityName = f.dcName
		}
	}
}

func (f *fixer) UpdateObject(ctx *simulator.Context, obj mo.Reference, _ []types.PropertyChange) {
	switch o := obj.(type) {
	case *simulator.VirtualMachine:
		fixRuntime(&o.VirtualMachine)
	case *mo.VirtualMachine:
		fixRuntime(o)
	}
}

func (f *fixer) RemoveObject(*simulator.Context, types.ManagedObjectReference) {}

func fixRuntime(vm *mo.VirtualMachine) {
	for _, rt := range []*types.VirtualMachineRuntimeInfo{&vm.Runtime, &vm.Summary.Runtime} {
		if rt.FaultToleranceState == "" {
			rt.FaultToleranceState = types.VirtualMachineFaultToleranceStateNotConfigured
		}
		if rt.RecordReplayState == "" {
			rt.RecordReplayState = types.VirtualMachineRecordReplayStateInactive
		}
	}
}
