// A client that follows redirects by Go's net/http rules, for tests/tests/attacks_upstream.rs:
// one GET with the client's token as `Authorization`, over TLS verified against the given CA.
// containerd, CRI-O, skopeo, podman and buildah are Go programs that set `Authorization` on the
// request itself, so a redirect carries it wherever net/http copies it: since Go 1.2x, to the
// same host name or a name below it, whatever the port and scheme. Standard library only.
//
// Usage: redirect-client <url> <token> <ca.pem>; prints the final answer's status code.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: redirect-client <url> <token> <ca.pem>")
		os.Exit(2)
	}
	url, token, caFile := os.Args[1], os.Args[2], os.Args[3]
	pem, err := os.ReadFile(caFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		fmt.Fprintln(os.Stderr, "no certificate in", caFile)
		os.Exit(1)
	}
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	resp, err := client.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	fmt.Println(resp.StatusCode)
}
