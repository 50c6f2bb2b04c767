package main

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// state is what a node changes outside its directory, written before the change so that a node
// killed before it could undo it is undone by the next one.
type state struct {
	Dir        string
	Bridge     string
	NATChain   string
	CgroupRoot string
	Containerd string
	// The binary whose `kube-proxy --cleanup` removes kube-proxy's rules, once it has started.
	ProxyCleanup string
	// The kubelet's own iptables chains (KUBE-FIREWALL, its canaries) are this node's to
	// remove: they did not exist before it.
	KubeletChains bool
	// The kubelet sets these (its kernel tunables); their values before it did.
	Sysctls map[string]string
	// Network namespaces that existed before this node: never removed by it.
	ForeignNetns []string
}

// The sysctls the kubelet changes at start unless protectKernelDefaults is set (which would make
// it refuse to start instead), and the one the node sets for Services (bridgeNetfilter).
var kubeletSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", bridgeNetfilter,
}

// bridgeNetfilter makes bridged packets pass iptables: a pod reaching a Service whose endpoint
// is on the same bridge gets its reply un-NATed only then.
const bridgeNetfilter = "net/bridge/bridge-nf-call-iptables"

func saveSysctls() map[string]string {
	saved := map[string]string{}
	for _, name := range kubeletSysctls {
		if v, err := os.ReadFile("/proc/sys/" + name); err == nil {
			saved[name] = strings.TrimSpace(string(v))
		}
	}
	return saved
}

func (s *state) write() error {
	data, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return os.WriteFile(stateFile, data, 0o600)
}

func readState() (*state, error) {
	data, err := os.ReadFile(stateFile)
	if err != nil {
		return nil, err
	}
	s := &state{}
	return s, json.Unmarshal(data, s)
}

// undo removes everything the node made and restores what it changed; each step is best-effort,
// so that one leftover does not keep the others.
func (s *state) undo() {
	if s.Containerd != "" {
		killShims(s.Containerd)
	}
	killCgroup(s.CgroupRoot)
	unmountUnder(s.Dir)
	unmountSandboxNetns(s.ForeignNetns)
	removeCgroup(s.CgroupRoot)
	_ = exec.Command("ip", "link", "delete", s.Bridge).Run()
	removeNATChain(s.NATChain)
	if s.KubeletChains {
		removeKubeletChains()
	}
	if s.ProxyCleanup != "" {
		if out, err := exec.Command(s.ProxyCleanup, "kube-proxy", "--cleanup").CombinedOutput(); err != nil {
			logf("kube-proxy --cleanup: %v: %s", err, out)
		}
	}
	for name, value := range s.Sysctls {
		_ = os.WriteFile("/proc/sys/"+name, []byte(value), 0o644)
	}
	if err := os.RemoveAll(s.Dir); err != nil {
		logf("removing %s: %v", s.Dir, err)
	}
	_ = os.Remove(stateFile)
}

// lock takes the machine-wide node lock, waiting for another node to stop.
func lock(wait time.Duration) (func(), error) {
	f, err := os.OpenFile(lockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	announced := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("another node holds %s after %s", lockFile, wait)
		}
		if !announced {
			logf("waiting for another node on this machine to stop (%s)", lockFile)
			announced = true
		}
		time.Sleep(500 * time.Millisecond)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

// killShims kills the runc shims that serve the containerd at socket: they outlive containerd
// by design, and hold the containers of a node that is gone.
func killShims(socket string) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		for i, a := range args {
			if a == "-address" && i+1 < len(args) && args[i+1] == socket {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				break
			}
		}
	}
}

// cgroupHierarchies are the mounted cgroup v1 hierarchies (and the v2 one, if any).
func cgroupHierarchies() []string {
	var out []string
	for _, m := range mounts() {
		if m.fstype == "cgroup" || m.fstype == "cgroup2" {
			out = append(out, m.point)
		}
	}
	return out
}

// killCgroup kills every process in the node's cgroup tree (the pods' containers).
func killCgroup(root string) {
	for _, h := range cgroupHierarchies() {
		dir := filepath.Join(h, root)
		_ = filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
			if err != nil || !info.IsDir() {
				return nil
			}
			procs, _ := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			for _, f := range strings.Fields(string(procs)) {
				if pid, err := strconv.Atoi(f); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			return nil
		})
	}
}

// removeCgroup removes the node's cgroup directories, deepest first (a cgroup with processes
// cannot be removed; they were killed just before, give them a moment).
func removeCgroup(root string) {
	for attempt := 0; attempt < 20; attempt++ {
		left := 0
		for _, h := range cgroupHierarchies() {
			var dirs []string
			_ = filepath.Walk(filepath.Join(h, root), func(path string, info os.FileInfo, err error) error {
				if err == nil && info.IsDir() {
					dirs = append(dirs, path)
				}
				return nil
			})
			sort.Sort(sort.Reverse(sort.StringSlice(dirs)))
			for _, d := range dirs {
				if err := syscall.Rmdir(d); err != nil && !os.IsNotExist(err) {
					left++
				}
			}
		}
		if left == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	logf("some cgroups under /%s could not be removed", root)
}

type mount struct{ point, fstype string }

func mounts() []mount {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []mount
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		// id parent major:minor root mountpoint options [optional...] - fstype source super
		if len(fields) < 7 {
			continue
		}
		sep := 6
		for sep < len(fields) && fields[sep] != "-" {
			sep++
		}
		if sep+1 >= len(fields) {
			continue
		}
		out = append(out, mount{point: unescapeMount(fields[4]), fstype: fields[sep+1]})
	}
	return out
}

func unescapeMount(s string) string {
	return strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(s)
}

// unmountUnder lazily unmounts every mount under dir, deepest first.
func unmountUnder(dir string) {
	if dir == "" {
		return
	}
	prefix := strings.TrimRight(dir, "/") + "/"
	var points []string
	for _, m := range mounts() {
		if strings.HasPrefix(m.point, prefix) {
			points = append(points, m.point)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, p := range points {
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil {
			logf("unmounting %s: %v", p, err)
		}
	}
}

// unmountSandboxNetns removes the network namespaces containerd's CRI made for sandboxes
// (/var/run/netns/cni-*) that no process holds any more: a node stopped in order has none left,
// a node that was killed leaves them.
func unmountSandboxNetns(foreign []string) {
	for _, name := range sandboxNetns() {
		if contains(foreign, name) {
			continue
		}
		path := filepath.Join("/var/run/netns", name)
		_ = syscall.Unmount(path, syscall.MNT_DETACH)
		_ = os.Remove(path)
	}
}

func removeNATChain(chain string) {
	for _, hook := range []string{"PREROUTING", "OUTPUT"} {
		for exec.Command("iptables", "-w", "-t", "nat", "-D", hook, "-j", chain).Run() == nil {
		}
	}
	_ = exec.Command("iptables", "-w", "-t", "nat", "-F", chain).Run()
	_ = exec.Command("iptables", "-w", "-t", "nat", "-X", chain).Run()
}

func decodeBase64(s string) ([]byte, error) {
	return base64.StdEncoding.DecodeString(strings.TrimSpace(s))
}

// sandboxNetns names the network namespaces of CRI sandboxes on this machine.
func sandboxNetns() []string {
	var out []string
	entries, _ := os.ReadDir("/var/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "cni-") {
			out = append(out, e.Name())
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// kubeletChains are the iptables chains the kubelet makes, by table.
var kubeletChains = map[string][]string{
	"filter": {"KUBE-FIREWALL", "KUBE-KUBELET-CANARY"},
	"nat":    {"KUBE-KUBELET-CANARY"},
	"mangle": {"KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"},
}

// kubeletChainsExist says whether the kubelet's firewall chain is already on the machine.
func kubeletChainsExist() bool {
	return exec.Command("iptables", "-w", "-t", "filter", "-S", "KUBE-FIREWALL").Run() == nil
}

// removeKubeletChains removes the kubelet's chains and the jumps to them, for IPv4 and IPv6.
func removeKubeletChains() {
	for _, tool := range []string{"iptables", "ip6tables"} {
		for _, hook := range []string{"INPUT", "OUTPUT"} {
			for exec.Command(tool, "-w", "-t", "filter", "-D", hook, "-j", "KUBE-FIREWALL").Run() == nil {
			}
		}
		for table, chains := range kubeletChains {
			for _, chain := range chains {
				_ = exec.Command(tool, "-w", "-t", table, "-F", chain).Run()
				_ = exec.Command(tool, "-w", "-t", table, "-X", chain).Run()
			}
		}
	}
}
