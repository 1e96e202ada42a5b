// A client that sends request trailers, for tests/tests/upstream_trailers.rs: one PUT with a
// streamed body and trailers after it (`Authorization` repeating the client's token, and a
// harmless `X-Checksum`), over HTTP/2 without TLS (prior knowledge). No registry client sends
// trailers; Go's own net/http is the real HTTP/2 stack that can. Standard library only.
//
// Usage: go run trailer-client.go <url> <token>; prints the answer's status code.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: trailer-client <url> <token>")
		os.Exit(2)
	}
	url, token := os.Args[1], os.Args[2]
	body, w := io.Pipe()
	req, err := http.NewRequest(http.MethodPut, url, body)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.ContentLength = -1
	req.Trailer = http.Header{}
	req.Trailer.Set("Authorization", "Bearer "+token)
	req.Trailer.Set("X-Checksum", "sha256:abc")
	go func() {
		_, _ = w.Write([]byte("layer-bytes"))
		_ = w.Close()
	}()
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: &protocols}}
	resp, err := client.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	fmt.Println(resp.StatusCode)
}
