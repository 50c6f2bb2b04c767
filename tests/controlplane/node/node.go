package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	remote "k8s.io/cri-client/pkg"
)

// node is one running node: its children in start order.
type node struct {
	opts          *options
	state         *state
	apiserverHost string
	caPEM         []byte
	exited        chan error

	containerd, controllers, scheduler, kubelet, proxy *child
	dns                                                *clusterDNS
}

// The controllers Deployments and DaemonSets need, beside the control plane's own (garbage
// collector, namespace): pods of the workloads, the default ServiceAccount and the root CA
// ConfigMap that token volumes mount, EndpointSlices for Services, the pod GC, PodDisruptionBudget
// status, node lifecycle (it lifts the not-ready taint a kubelet registers its Node with), and the
// binding of PersistentVolumeClaims to PersistentVolumes and the removal of their protection
// finalizers once unused (without those, deleting a claim or volume never completes).
const nodeControllers = "deployment-controller,replicaset-controller,daemonset-controller," +
	"serviceaccount-controller,root-ca-certificate-publisher-controller,endpointslice-controller," +
	"pod-garbage-collector-controller,disruption-controller,node-lifecycle-controller," +
	"persistentvolume-binder-controller,persistentvolumeclaim-protection-controller," +
	"persistentvolume-protection-controller"

func (n *node) path(parts ...string) string {
	return filepath.Join(append([]string{n.opts.dir}, parts...)...)
}

// gateway is the bridge's address: the pods' default route, and the node's IP.
func (n *node) gateway() string {
	return strings.TrimSuffix(n.opts.subnet, "0/24") + "1"
}

func (n *node) start() error {
	n.exited = make(chan error, 1)
	if err := n.network(); err != nil {
		return fmt.Errorf("pod network: %w", err)
	}
	if err := n.startContainerd(); err != nil {
		return err
	}
	for _, archive := range n.opts.images {
		out, err := exec.Command("ctr", "--address", n.state.Containerd, "--namespace", "k8s.io",
			"images", "import", "--no-unpack=false", archive).CombinedOutput()
		if err != nil {
			return fmt.Errorf("importing %s: %v: %s", archive, err, out)
		}
	}
	if err := n.startControllers(); err != nil {
		return err
	}
	if err := n.startKubelet(); err != nil {
		return err
	}
	// Services: kube-proxy's rules for ClusterIPs, and names for them.
	if err := n.startProxy(); err != nil {
		return err
	}
	var err error
	n.dns, err = startClusterDNS(n.opts.kubeconfig, net.JoinHostPort(n.gateway(), "53"))
	return err
}

// network makes the pods' bridge and the route from pods to the apiserver: the `kubernetes`
// Service's ClusterIP, NATed to the apiserver's loopback address (there is no kube-proxy).
func (n *node) network() error {
	gateway := n.gateway()
	steps := [][]string{
		{"ip", "link", "add", bridge, "type", "bridge"},
		{"ip", "addr", "add", gateway + "/24", "dev", bridge},
		{"ip", "link", "set", bridge, "up"},
	}
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	if err := os.WriteFile("/proc/sys/"+bridgeNetfilter, []byte("1"), 0o644); err != nil {
		logf("warning: %s: %v (load br_netfilter: a pod reaching a Service endpoint on the same bridge will not get replies)", bridgeNetfilter, err)
	}
	// Packets from the bridge may be NATed to 127.0.0.1 only with route_localnet on it.
	if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+bridge+"/route_localnet", []byte("1"), 0o644); err != nil {
		return err
	}
	_, apiPort, err := net.SplitHostPort(n.apiserverHost)
	if err != nil {
		return fmt.Errorf("apiserver address %q: %w", n.apiserverHost, err)
	}
	rules := [][]string{
		{"-N", natChain},
		{"-A", natChain, "-d", apiserverServiceIP + "/32", "-p", "tcp", "--dport", "443",
			"-j", "DNAT", "--to-destination", "127.0.0.1:" + apiPort},
		{"-I", "PREROUTING", "-j", natChain},
	}
	for _, r := range rules {
		args := append([]string{"-w", "-t", "nat"}, r...)
		if out, err := exec.Command("iptables", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("iptables %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return writeCNIConfig(n.path("cni", "net.d"), n.path("cni", "ipam"), n.opts.subnet)
}

func (n *node) startContainerd() error {
	config := n.path("containerd.toml")
	if err := os.WriteFile(config, []byte(containerdConfig(n.opts.dir, n.state.Containerd, n.opts.runc)), 0o644); err != nil {
		return err
	}
	var err error
	if n.containerd, err = n.spawn("containerd", "containerd", "--config", config); err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if !n.containerd.running() {
			return fmt.Errorf("containerd exited at start; its log:\n%s", tail(n.containerd.log, 30))
		}
		if exec.Command("ctr", "--address", n.state.Containerd, "version").Run() == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("containerd did not answer on %s within 60s; its log:\n%s", n.state.Containerd, tail(n.containerd.log, 30))
}

func (n *node) startControllers() error {
	self := filepath.Join(n.opts.binDir, "controlplane")
	caFile := n.path("ca.crt")
	if err := os.WriteFile(caFile, n.caPEM, 0o644); err != nil {
		return err
	}
	var err error
	n.controllers, err = n.spawn("kube-controller-manager", self, "kube-controller-manager",
		"--kubeconfig="+n.opts.kubeconfig,
		"--authentication-kubeconfig="+n.opts.kubeconfig,
		"--authorization-kubeconfig="+n.opts.kubeconfig,
		"--controllers="+nodeControllers,
		"--root-ca-file="+caFile,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--cert-dir="+n.path("kube-controller-manager"),
		"--v=1",
	)
	if err != nil {
		return err
	}
	schedConfig := n.path("kube-scheduler.yaml")
	content := "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n" +
		"clientConnection:\n  kubeconfig: " + n.opts.kubeconfig + "\nleaderElection:\n  leaderElect: false\n"
	if err := os.WriteFile(schedConfig, []byte(content), 0o644); err != nil {
		return err
	}
	n.scheduler, err = n.spawn("kube-scheduler", self, "kube-scheduler", "--config="+schedConfig, "--secure-port=0")
	return err
}

// startProxy runs kube-proxy in iptables mode for the pods' subnet. It leaves the machine's
// conntrack table sizes and timeouts and its oom_score_adj alone (zero values: "do not set"), and
// makes no node ports on loopback (which would set route_localnet on every interface). Its rules
// are removed by `kube-proxy --cleanup` when the node stops (state.undo).
func (n *node) startProxy() error {
	healthz, err := freePort()
	if err != nil {
		return err
	}
	metrics, err := freePort()
	if err != nil {
		return err
	}
	config := n.path("kube-proxy.yaml")
	content := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: %s
hostnameOverride: %s
mode: iptables
clusterCIDR: %s
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:%d
metricsBindAddress: 127.0.0.1:%d
oomScoreAdj: 0
iptables:
  localhostNodePorts: false
  syncPeriod: 30s
  minSyncPeriod: 0s
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
`, n.opts.kubeconfig, n.opts.name, n.opts.subnet, healthz, metrics)
	if err := os.WriteFile(config, []byte(content), 0o644); err != nil {
		return err
	}
	self := filepath.Join(n.opts.binDir, "controlplane")
	n.state.ProxyCleanup = self
	if err := n.state.write(); err != nil {
		return err
	}
	if n.proxy, err = n.spawn("kube-proxy", self, "kube-proxy", "--config="+config, "--v=1"); err != nil {
		return err
	}
	return waitHealthz(n.proxy, healthz, 60*time.Second)
}

func (n *node) startKubelet() error {
	if err := makeCgroupRoot(cgroupRoot); err != nil {
		return fmt.Errorf("cgroup root /%s: %w", cgroupRoot, err)
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	healthz, err := freePort()
	if err != nil {
		return err
	}
	config := n.path("kubelet.yaml")
	if err := os.WriteFile(config, []byte(kubeletConfig(n.opts.dir, n.state.Containerd, n.gateway(), port, healthz)), 0o644); err != nil {
		return err
	}
	self := filepath.Join(n.opts.binDir, "controlplane")
	n.kubelet, err = n.spawn("kubelet", self, "kubelet",
		"--config="+config,
		"--kubeconfig="+n.opts.kubeconfig,
		"--root-dir="+n.path("kubelet"),
		"--cert-dir="+n.path("kubelet", "pki"),
		"--hostname-override="+n.opts.name,
		// The kubelet refuses a loopback node IP; the bridge's address is this machine's too.
		"--node-ip="+n.gateway(),
		"--v=1",
	)
	if err != nil {
		return err
	}
	return waitHealthz(n.kubelet, healthz, 120*time.Second)
}

// waitHealthz waits until c answers 200 on /healthz at 127.0.0.1:port, failing with the tail of
// its log if it exits first or does not answer within timeout.
func waitHealthz(c *child, port int, timeout time.Duration) error {
	url := "http://127.0.0.1:" + strconv.Itoa(port) + "/healthz"
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if !c.running() {
			return fmt.Errorf("%s exited at start; its log:\n%s", c.name, tail(c.log, 40))
		}
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("%s /healthz not OK within %s; its log:\n%s", c.name, timeout, tail(c.log, 40))
}

// stop stops the node in the reverse order of its start. The pods' sandboxes are stopped and
// removed through the CRI while containerd still runs, so that their network namespaces and
// bridge ports go the ordinary way; state.undo (deferred by the caller) sweeps up the rest.
func (n *node) stop() {
	n.dns.stop()
	n.proxy.stop(10 * time.Second)
	n.kubelet.stop(20 * time.Second)
	n.scheduler.stop(10 * time.Second)
	n.controllers.stop(10 * time.Second)
	if n.containerd != nil && n.containerd.running() {
		removeSandboxes(n.state.Containerd)
	}
	n.containerd.stop(20 * time.Second)
}

func removeSandboxes(socket string) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	runtime, err := remote.NewRemoteRuntimeService(ctx, "unix://"+socket, 10*time.Second, nil, false)
	if err != nil {
		logf("connecting to containerd's CRI: %v", err)
		return
	}
	sandboxes, err := runtime.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{})
	if err != nil {
		logf("listing sandboxes: %v", err)
		return
	}
	for _, sb := range sandboxes {
		if err := runtime.StopPodSandbox(ctx, sb.Id); err != nil {
			logf("stopping sandbox %s: %v", sb.Id, err)
		}
		if err := runtime.RemovePodSandbox(ctx, sb.Id); err != nil {
			logf("removing sandbox %s: %v", sb.Id, err)
		}
	}
}

// makeCgroupRoot creates /<root> in every cgroup hierarchy (the kubelet refuses a cgroup root that
// does not exist); cpuset needs its CPUs and memory nodes copied from the parent.
func makeCgroupRoot(root string) error {
	for _, h := range cgroupHierarchies() {
		dir := filepath.Join(h, root)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if parent, err := os.ReadFile(filepath.Join(h, f)); err == nil {
				if err := os.WriteFile(filepath.Join(dir, f), parent, 0o644); err != nil {
					return fmt.Errorf("%s: %w", filepath.Join(dir, f), err)
				}
			}
		}
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
