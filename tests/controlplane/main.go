// Command controlplane runs a real Kubernetes control plane for Flotilla's tests and local demo:
// an embedded etcd and kube-apiserver (and, optionally, the garbage-collector and namespace
// controllers of kube-controller-manager) on loopback, built from the Kubernetes Go modules.
//
// The same binary is also kubectl, kube-scheduler, kube-controller-manager, kubelet and kube-proxy of the
// same version: the entry point is chosen by the name it is invoked as (a symlink named kubectl) or by
// its first argument (`controlplane kubectl get pods`).
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"

	// Client auth plugins, as the real kubectl links them.
	_ "k8s.io/client-go/plugin/pkg/client/auth"
)

func main() {
	name := filepath.Base(os.Args[0])
	if len(os.Args) > 1 && isComponent(os.Args[1]) {
		// `controlplane kubectl get pods` behaves exactly like `kubectl get pods`: kubectl reads
		// os.Args itself (plugins, verbosity), so shift the component name into argv[0].
		name = os.Args[1]
		os.Args = os.Args[1:]
	}
	switch name {
	case "kubectl":
		runKubectl()
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kubelet":
		os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
	case "kube-proxy":
		os.Exit(cli.Run(proxy.NewProxyCommand()))
	default:
		if err := runControlPlane(os.Args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "controlplane: %v\n", err)
			os.Exit(1)
		}
	}
}

func isComponent(arg string) bool {
	switch arg {
	case "kubectl", "kube-scheduler", "kube-controller-manager", "kubelet", "kube-proxy":
		return true
	}
	return false
}

func runKubectl() {
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) //nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
}
